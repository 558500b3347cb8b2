<div class="size-container">
  <p class="size-container__title">Pick your size</p>
  <div class="size-container__entries">
  % for item in product.items:
    % level = item.level
    <button class="size-container__entry size-container__entry--level-{{level}}" value="{{item.id}}" title="Size {{item.size}}: {{'sold out' if level == 'out' else level + ' stock'}}"{{!' disabled' if level == 'out' else ''}}>{{item.size}}</button>
  % end
  </div>
</div>
