% scheduled = product.release_at and not product.released
<li class="product" data-product-id="{{product.id}}" data-released="{{'true' if product.released else 'false'}}" data-release-at="{{iso(product.release_at) if scheduled else ''}}">
  <img class="product__image" src="/static/{{product.image}}" alt="{{product.name}} in {{product.color}}" width="400" height="260">
  <div class="product__body">
    <p class="product__brand">{{product.brand}}</p>
    <h2 class="product__name">{{product.name}}</h2>
    <p class="product__color">{{product.color}}</p>
    <p class="product__price">{{price(product.price_cents)}}</p>
    <div class="product__sizes">
    % if product.released:
      % include('size_selector', product=product)
    % else:
      <p class="coming-soon">Coming soon</p>
      <p class="countdown" aria-live="off"></p>
    % end
    </div>
    <p class="product__status" role="status" aria-live="polite"></p>
  </div>
</li>
