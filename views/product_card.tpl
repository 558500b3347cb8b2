% scheduled = product.state == 'scheduled'
% sold_out = product.released and all(item.level == 'out' for item in product.items)
<li class="product{{' product--sold-out' if sold_out else ''}}" id="product-{{product.id}}" data-product-id="{{product.id}}" data-released="{{'true' if product.released else 'false'}}" data-release-at="{{iso(product.moment) if scheduled else ''}}" data-draw="{{product.draw.state if product.draw else ''}}">
  <img class="product__image" src="/static/{{product.image}}" alt="{{product.name}} in {{product.color}}" width="400" height="260">
  <p class="product__sold-out">{{'Sold out' if sold_out else ''}}</p>
  <div class="product__body">
    <p class="product__brand">{{product.brand}}</p>
    <h2 class="product__name">{{product.name}}</h2>
    <p class="product__color">{{product.color}}</p>
    <p class="product__price">{{price(product.price_cents)}}</p>
    <div class="product__sizes">
    % if product.draw and product.draw.state != 'scheduled':
      % include('draw_panel', product=product, iso=iso)
    % elif product.released:
      % include('size_selector', product=product)
    % else:
      <p class="coming-soon">Coming soon</p>
      <p class="countdown" aria-live="off"></p>
    % end
    </div>
    <button type="button" class="product__buy" hidden></button>
    <p class="product__yours"></p>
    <p class="product__status" tabindex="-1"></p>
  </div>
</li>
